"""gunicorn settings shared by the control plane's WSGI services (scripts/openstack.sh).

Loaded by the master before it loads the application: Keystone's WSGI entry point parses
sys.argv with oslo.config, so the application must not see gunicorn's own arguments.
"""

import sys

sys.argv[1:] = []

workers = 1
worker_class = "gthread"
threads = 4
timeout = 300
graceful_timeout = 5
# No HTTP keep-alive ("Connection: close" on every response). gunicorn closes an idle
# keep-alive connection after `keepalive` seconds (2 by default), and a client polling at
# about that interval (openstacksdk's wait_for_server polls every 2 s) reuses a connection
# in the moment the server closes it: "Remote end closed connection without response"
# (seen once in the suite). A connection per request cannot race.
keepalive = 0
errorlog = "-"
# No control socket: its default path (~/.gunicorn/gunicorn.ctl) is one for every
# gunicorn of the user, and these masters are stopped by signal anyway.
control_socket_disable = True
