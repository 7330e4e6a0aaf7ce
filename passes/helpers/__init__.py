"""Libraries the passes share (attention matching and sites, graph utilities, head grouping and
permutation, capture, the search's ladder, allocation and measurements, suffix runs): no
pass lives here; each pass is one module of ``sparsec.passes``."""
