"""The run directory: its layout (``layout``), table schemas (``schemas``) and readers
(``embeddings`` and ``tables``). Every stage, the report and the benchmarks find a run's files
through here; ARCHITECTURE.md lists the contracts."""
