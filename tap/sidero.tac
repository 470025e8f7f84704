# sidero as a twistd application file, configured only by environment variables.
#
#   SIDERO_STATE_DIR=/var/lib/sidero SIDERO_CONTROLLER_MANAGER_API_ENDPOINT=10.0.0.2 \
#       twistd --nodaemon --pidfile= -y tap/sidero.tac
#
# Every setting of `python -m sidero.config --markdown` is read from its variable (SIDERO_*,
# SIDERO_CONTROLLER_MANAGER_*, API_ENDPOINT, KUBECONFIG); there are no command-line options
# here, so prefer `twistd sidero --help` / `twistd sidero [options]` when you can. An invalid
# value stops start-up with one line naming the variable. sidero must be importable (installed
# wheel, or PYTHONPATH=<repository>); logging goes to stdout in the SIDERO_LOG_FORMAT format
# unless twistd is given --logger.
from sidero.tap import make_application

application = make_application()
