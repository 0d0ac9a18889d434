"""The daemon: memoryd.v1 over gRPC in front of one LocalMemory.

    service.py   MemoryServicer: thin handlers (decode, one backend call, encode)
    server.py    server wiring: health, reflection, logging, lifecycle, one daemon per data dir
    config.py    the daemon's configuration (defaults < TOML < env < flags)
    cli.py       the `memoryd` command
"""
