"""Two boards on a test LAN and a real Home Assistant (scripts/check-lan).

The boards are network namespaces with names of their own (tests/lan.py), one on
a plain veth link, one on a shaped link (20 ms ± 10 ms, 1 % loss: the kernel here
has no netem, tests/lan_wire.py stands in for it). Each runs a runtime host on
the board's Python with zeroconf; Home Assistant (the newest release, the venv of
scripts/check-newest-ha) runs in the root namespace and is driven through its
REST and websocket API as a user would. See ``__main__`` for the steps.
"""
