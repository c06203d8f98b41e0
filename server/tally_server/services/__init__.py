"""Use cases: one module per capability, each owning its transactions; they call storage
and apply the rules of domain. The gRPC edge (rpc) calls these and nothing below."""
