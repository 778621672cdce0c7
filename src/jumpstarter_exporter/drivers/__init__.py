"""Drivers: small classes with typed config, exported methods and byte streams, and the
registry that maps ``type:`` strings (ours and upstream's) to them. Drivers never import the
exporter; the exporter hands them what they need."""
