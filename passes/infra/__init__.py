"""What runs passes: the pass manager, its instruments and the compile context it hands each
pass, and the numbered dumps it writes."""
