"""Ray Data pipelines (imported as omnireel.pipelines). Built by the batch issue."""
