"""`anemll-chat`: the terminal client. Imports only shared/, pyzmq, msgpack, platformdirs."""
