"""Runtimes behind one protocol (`base.Runtime`): `SimulatorRuntime` (every rank in this
process) and `ProcessGroupRuntime` (one rank of a torch.distributed mesh), with the
collectives, simulator, pipeline schedules and process groups they run on."""
