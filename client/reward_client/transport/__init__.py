"""Wire-level pieces shared by the sync and asyncio clients: tensors, errors, pipelining."""
