"""
Helpers shared by the test modules: doubles, the proxy stack, and what
clients send and read. Fixtures live in C{conftest.py}; test modules
import helpers from here, never from each other.
"""
