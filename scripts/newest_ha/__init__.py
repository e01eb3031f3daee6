"""The integration in a real Home Assistant process of the newest release (scripts/check-newest-ha).

Not the pytest plugin (which pins an older release): the ``hass`` of the venv this
runs in, on a fresh configuration with the RKLLM simulator, driven through the
REST API as a user would drive it. See ``__main__`` for the steps.
"""
