"""
Settings: the schema, the environment file, SIGHUP reloads, and socket
activation.
"""
