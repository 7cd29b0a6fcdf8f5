import os
import sys

from pathmamba.forkserver import SOCKET_VARIABLE, run_in_server

# A workflow's fork server runs the command in a child that has torch imported already; where it declines
# or cannot be reached, it says so and the command runs in this process. See pathmamba/forkserver.py.
if os.environ.get(SOCKET_VARIABLE):
    status = run_in_server(sys.argv[1:], os.environ[SOCKET_VARIABLE])
    if status is not None:
        raise SystemExit(status)

from pathmamba.cli import main

raise SystemExit(main())
