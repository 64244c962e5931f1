"""gunicorn settings for bench/minimal_app.py: the API's own serving settings, so that the two differ only in the app.

Workers, worker class (the API's BufferingWorker), threads, keep-alive and timeouts are read from the project's
gunicorn.conf.py, loaded as a module of its own (it also installs its error pages and listener shutdown in
gunicorn, as for the API). Its hooks are left out: they load the API, its database pool and its metrics.
Flags given on the command line (bench/run.py passes the API's --workers, --worker-class, --threads) still win.
"""

import importlib.util
import sys
from pathlib import Path

SERVING = (
    "workers", "worker_class", "threads", "keepalive", "timeout", "graceful_timeout", "worker_connections",
    "max_requests", "max_requests_jitter", "control_socket_disable",
)  # fmt: skip

CONFIG = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
spec = importlib.util.spec_from_file_location("finstack_gunicorn_conf", CONFIG)
api = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = api  # kept: the worker class's methods read the module's settings while serving
spec.loader.exec_module(api)
globals().update({name: getattr(api, name) for name in SERVING if hasattr(api, name)})
