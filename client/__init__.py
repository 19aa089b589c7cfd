"""`anemll-chat`: the terminal client. Imports only client/, shared/, pyzmq,
msgpack and platformdirs (never torch or numpy), so it starts in a blink."""

__version__ = "0.1.0"  # the distribution's version (pyproject.toml); importlib.metadata costs startup time
