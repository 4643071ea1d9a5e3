"""One args model for both drivers: every DriverArgs field is a flag of `omnireel serve` and of
`omnireel batch` (help = its description) that reaches AppArgs / BatchOptions, the fields that apply
to `omnireel render` and `omnireel bench backbone` are theirs the same way, and a bad value is one
line naming the flag and the limit, exit 2, before anything starts."""
from __future__ import annotations

import pytest

from omnireel.cli import build_parser, flag_values, main
from omnireel.deployments.args import AppArgs
from omnireel.driver_args import DriverArgs, flag_name
from omnireel.pipelines.args import BatchOptions

# a value of every shared field, as typed on a command line, and as the model holds it
SHARED = {"checkpoint": ("/models/omni", "/models/omni"), "tp": ("2", 2), "sp": ("2", 2),
          "cfg_parallel": ("2", 2), "threads": ("3", 3), "dtype": ("bfloat16", "bfloat16"),
          "compute_niceness": ("none", None), "cpus_per_rank": ("0.5", 0.5),
          "voices_uri": ("s3://bucket/voices", "s3://bucket/voices"),
          "storyboard_model": ("/models/planner", "/models/planner"), "max_batch_jobs": ("4", 4),
          "max_batch_tokens": ("4096", 4096)}
DRIVERS = {"serve": ([], AppArgs), "batch": (["manifest.parquet", "--out", "s3://bucket/out"], BatchOptions)}
# the shared fields each one-process command takes, by what it does: render runs LocalEngine (no mesh,
# no Ray actors, no batching); bench backbone times seeded weights on a mesh (no checkpoint, no voices)
ONE_PROCESS = {"render": (["render"], {"checkpoint", "threads", "dtype", "voices_uri", "storyboard_model"}),
               "bench backbone": (["bench", "backbone"], {"tp", "sp", "cfg_parallel", "dtype"})}
COMMANDS = {**{command: leading for command, (leading, _) in DRIVERS.items()},
            **{command: argv for command, (argv, _) in ONE_PROCESS.items()}}


def test_every_shared_field_is_a_flag_of_serve_and_batch(capsys, monkeypatch):
    assert set(SHARED) == set(DriverArgs.model_fields)          # a new shared field needs a value here
    monkeypatch.setenv("COLUMNS", "10000")                        # help lines unwrapped
    for command, (leading, model) in DRIVERS.items():
        argv = [command, *leading]
        for name, (typed, _) in SHARED.items():
            argv += [flag_name(name, DriverArgs.model_fields[name]), typed]
        options = flag_values(build_parser().parse_args(argv), model)
        assert {name: getattr(options, name) for name in SHARED} == {k: v for k, (_, v) in SHARED.items()}
        assert options.mesh.ranks == 8

        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        for name, field in DriverArgs.model_fields.items():
            assert f"{flag_name(name, field)} " in shown and field.description in shown, (command, name)


@pytest.mark.parametrize("command", ONE_PROCESS)
def test_the_shared_fields_that_apply_are_flags_of_render_and_bench_backbone(capsys, monkeypatch, command):
    argv, names = ONE_PROCESS[command]
    given = [word for name in sorted(names) for word in (flag_name(name, DriverArgs.model_fields[name]),
                                                          SHARED[name][0])]
    args = build_parser().parse_args([*argv, *given])
    assert {name: getattr(args, name) for name in names} == {name: SHARED[name][1] for name in names}
    left_out = build_parser().parse_args(argv)                   # no config file: the field's default
    assert {name: getattr(left_out, name) for name in names} == {
        name: DriverArgs.model_fields[name].default for name in names}

    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    shown = capsys.readouterr().out
    for name, field in DriverArgs.model_fields.items():
        flag = f"{flag_name(name, field)} "
        if name in names:
            assert flag in shown and field.description in shown, (command, name)
        else:                                                    # a flag there would do nothing
            assert flag not in shown, (command, name)


def test_a_flag_left_out_keeps_the_default():
    args = build_parser().parse_args(["batch", "m.parquet", "--out", "o", "--tp", "2"])
    assert flag_values(args, BatchOptions) == BatchOptions(tp=2)
    assert flag_values(build_parser().parse_args(["serve"]), AppArgs).model_dump(exclude_unset=True) == {}


BAD_VALUES = [
    (["--tp", "0"], "--tp: must be >= 1 (got 0)"),
    (["--cfg-parallel", "3"], "--cfg-parallel: must be in 1..2 (got 3)"),
    (["--compute-niceness", "20"], "--compute-niceness: must be in -20..19 (got 20)"),
    (["--cpus-per-rank", "0"], "--cpus-per-rank: must be > 0 (got 0)"),
    (["--threads", "two"], "--threads: input should be a valid integer"),
    (["--threads", "0"], "--threads: must be >= 1 (got 0)"),
    (["--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
    (["--tpp=2"], "unrecognized arguments: --tpp=2"),         # render would read a bare 2 as its prompt
]


def takes(command: str, flag: str) -> bool:
    """Whether `command` has `flag` (or it is no field's: an unknown flag, refused by every command)."""
    name = flag.removeprefix("--").replace("-", "_")
    return command in DRIVERS or name not in DriverArgs.model_fields or name in ONE_PROCESS[command][1]


@pytest.mark.parametrize("command,flags,words", [(command, flags, words) for command in COMMANDS
                                                 for flags, words in BAD_VALUES if takes(command, flags[0])])
def test_a_bad_flag_value_is_one_line_naming_the_flag(capsys, command, flags, words):
    argv = [command, *COMMANDS[command]] if command in DRIVERS else COMMANDS[command]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("omnireel") and f": error: {words}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,words", [
    (["batch", "m.parquet", "--out", "o", "--limit", "0"], "--limit: must be >= 1 (got 0)"),    # its own fields
    (["batch", "m.parquet", "--out", "o", "--replicas", "0"], "--replicas: must be >= 1 (got 0)"),
    (["serve", "--max-batch-jobs", "0"], "--max-batch-jobs: must be >= 1 (got 0)"),
    (["serve", "--stage-threads", "{mux: 1}"], "--stage-threads: unknown stage 'mux'"),   # the field's validator
    (["serve", "--stage-threads", "{decode_audio: [1"], "--stage-threads: not valid YAML"),
    (["serve", "--set", "stage_threads={mux: 1}"], "stage_threads: unknown stage 'mux'"),
    (["serve", "--set", "tp=0"], "tp: must be >= 1 (got 0)"),                # a --set value, named by its arg
    (["serve", "--set", "tpp=2"], "tpp: unknown; allowed: checkpoint, tp,"),
    (["serve", "--set", "tp"], "--set: expected ARG=VALUE (got 'tp')"),
    (["serve", "--set", "stage_threads={a: [1"], "--set stage_threads: not valid YAML"),
])
def test_a_drivers_own_args_refused_in_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags,words", [(["--batch-jobs", "1"], "--batch-jobs: must be >= 2 (got 1)"),
                                         (["--tp", "0"], "--tp: must be >= 1 (got 0)")])
def test_the_batch_benchmarks_bad_flag_values_are_one_line(flags, words):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "batch.py"
    done = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"batch.py: error: {words}" in done.stderr, \
        done.stderr
