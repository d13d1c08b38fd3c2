"""The library version, recorded in every exported model's provenance (``darwinlm.json``).

Its own module so that what records it (``run.export``) need not import the package's face
(``darwinlm/__init__``), which imports the runner: no import runs back up.
"""

__version__ = "0.1.0"
