"""Generic adapter machinery: the layer protocol, the method registry, target matching, attach
and detach, accounting and adapter files. Nothing here names a particular method."""
