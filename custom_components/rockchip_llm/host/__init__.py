"""The runtime host: everything on the NPU side of the integration.

It owns the runtime library (checks and the private copy), the model folders, the
prompt cache store and one worker process per model, and serves them to one Home
Assistant over a link (a socket pair, a Unix socket or TCP). It runs on the board's
own ``python3`` (3.11 or newer) with the standard library only, and imports nothing
of the Home Assistant side: ``python3 <this folder> --help`` starts it.
"""
