"""torchrun for one node, with every socket of the job on the loopback interface.

    python -m ddpm.torchrun_loopback --nproc-per-node 2 -m ddpm.train_ddp ...   (torchrun's options)

`torchrun --standalone` serves its rendezvous store (a c10d TCPStore, which accepts any client
and runs no authentication) on every interface of the machine, and gloo's and NCCL's own
sockets listen on the address the host name resolves to: on a shared or public network, anyone
who can reach the node can join or disturb the job. One node needs none of that, so this
launcher, before handing over to torchrun (`torch.distributed.run.main`, unchanged):

- opens the store's listening socket itself, bound to 127.0.0.1, and serves a TCPStore from it
  (`master_listen_fd`); torchrun's static rendezvous at 127.0.0.1:that port then finds that
  server (a `multi_tenant` store shares the server of its port within a process) rather than
  binding a new one on all interfaces, and the workers join it as clients (the agent's store);
- points gloo and NCCL at the loopback interface (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME = lo,
  on Linux) unless the user chose an interface.

Several nodes need reachable sockets by nature: ddpm.torchrun runs torchrun itself for them.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"


def loopback_store(timeout_seconds: float = 300.0):
    """(store, port): a TCPStore server listening on 127.0.0.1 alone, multi-tenant so that
    torchrun's rendezvous in this process uses it."""
    from torch.distributed import TCPStore

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = TCPStore(LOOPBACK, port, is_master=True, timeout=datetime.timedelta(seconds=timeout_seconds),
                     wait_for_workers=False, multi_tenant=True, master_listen_fd=listener.detach())
    return store, port


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import main as torchrun, parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    given = parse_args(argv)   # torchrun's own reading of the options (abbreviations, both spellings)
    if (given.standalone or given.nnodes not in ("1", "1:1") or given.node_rank != 0 or given.rdzv_endpoint
            or given.rdzv_backend != "static" or given.master_addr != LOOPBACK):
        raise SystemExit("ddpm.torchrun_loopback runs one node and chooses its own rendezvous: leave out "
                         "--standalone, --nnodes, --node-rank, --rdzv-* and --master-addr")
    if sys.platform == "linux":   # the loopback interface's name elsewhere differs (lo0): left to the user
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, LOOPBACK_INTERFACE)   # the workers inherit them
    store, port = loopback_store()
    torchrun(["--nnodes", "1", "--node-rank", "0", "--rdzv-backend", "static",
              "--rdzv-endpoint", f"{LOOPBACK}:{port}", *argv])
    del store   # served until torchrun is done with it


if __name__ == "__main__":
    main()
