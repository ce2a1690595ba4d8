"""Build-time scripts: the embedded tiny model and (later) model baking."""
