"""The multi-host lab: several hosts on one machine, and real network faults between them."""
