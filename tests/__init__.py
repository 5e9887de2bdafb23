"""The test suite, a package so that every test module imports its shared code as ``tests.support``."""
