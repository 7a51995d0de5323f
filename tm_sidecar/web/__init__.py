"""The web dashboard (``tm-sidecar --web [HOST:]PORT``): queues, nodes and tasks, live.

Owns the dashboard's pages, its access rules and its live event streams. It reads
through the sidecar (its etcd connection, its event hub) and repairs through
``tm_sidecar.admin``, as ``tmctl`` does, so that a click and a ``tmctl`` command make the
same moves. Besides the parts below it uses starlette, hypercorn and jinja2; only the
command line imports it, and only when ``--web`` is given.

Its modules: ``_app.py`` (the service, its routes and the guard), ``_pages.py`` (the
pages that read), ``_forms.py`` (the pages that take a form: actions, the token),
``_actions.py`` (what each action takes and does), ``_access.py`` (tokens, sessions,
cross-site checks), ``_data.py`` (what the pages show, read from etcd), ``_journal.py``
(what the hub told), ``_census.py`` (tasks per queue, counted), ``_stats.py`` (a
queue's pictures: finished tasks and waits over a window), ``_live.py`` (event
streams), ``_templates.py`` (templates and filters), ``_http.py`` (headers, forms, cookies).

May import: core, etcd, node, admin.
"""

from ._access import TokenError, load_token
from ._app import Dashboard, WebSettings

__all__ = ["Dashboard", "TokenError", "WebSettings", "load_token"]
