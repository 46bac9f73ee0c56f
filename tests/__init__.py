"""The test suite, a package so that its folders (tests.sgdata, tests.sgmodel) never shadow the real packages
and shared helpers import as tests.helpers.<module>."""
