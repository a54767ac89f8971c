"""torch.distributed: process-group runtime under torchrun, and DistributedDataParallel as a diff side."""
