"""Qt pieces shared by the Raptor modules (Raptor Embed and Raptor Probe)."""
