"""Who may do what: API tokens, the rights they carry, and the daemon's check of them.

    tokens.py    the token format (mdt_<id>_<secret>), its hash, its roles
    rights.py    Guard: the one place the rules live; LocalMemory asks it on
                 every call, so the daemon and the in-process backend agree
    callers.py   Authenticator: the daemon turns a call's token (metadata
                 `authorization: Bearer <token>`) into a Caller, with a
                 short-lived cache (revocation is effective within TOKEN_TTL_S)

A layer of its own above the core: it imports only memoryd's core modules.
The engine keeps the `tokens` table (memoryd.engine.tokens.TokenStore), the
wire layer the messages (memoryd.wire.tokens) and the metadata key
(memoryd.wire.channel.AUTH_METADATA).

Auth is off unless the daemon runs with `memoryd serve --auth`; then every
RPC but the gRPC health service needs a token. With auth off every caller
has every right (the unix socket's mode, 0600 by default, is the fence).
"""
