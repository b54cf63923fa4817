"""FX graph passes: canonicalize (every attention spelling → one SDPA node) and substitute
(SDPA → the chosen method's op). Installed as `attnrewrite.passes`."""
