"""The ``simsiam`` command line: thin click commands over the library."""
