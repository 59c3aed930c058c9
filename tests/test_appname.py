"""The service name a process guesses from its command line: the app's under a runner, never the runner's."""

from __future__ import annotations

import pytest

from meshlib.appname import default_service


@pytest.mark.parametrize(
    ("argv", "cwd", "expected"),
    [
        (["/srv/orders.py"], "/srv", "orders"),
        (["/venv/lib/orders/__main__.py"], "/srv", "orders"),  # python -m orders
        (["/venv/bin/gunicorn", "-w", "2", "-b", "127.0.0.1:8000", "frontend:app"], "/srv", "frontend"),
        (["/venv/lib/gunicorn/__main__.py", "shop_front:app"], "/srv", "shop-front"),  # python -m gunicorn
        (["/venv/bin/gunicorn", "mysite.wsgi"], "/srv", "mysite"),
        (["/venv/bin/gunicorn", "mysite.wsgi:application", "-c", "gunicorn.conf.py"], "/srv", "mysite"),
        (["/venv/bin/gunicorn", "mysite.asgi", "-k", "uvicorn.workers.UvicornWorker"], "/srv", "mysite"),
        (["/venv/bin/gunicorn", "-k", "uvicorn.workers.UvicornWorker", "mysite.asgi"], "/srv", "mysite"),
        (["/venv/bin/uvicorn", "orders.main:app", "--port", "8000"], "/srv", "orders"),
        (["/venv/bin/uvicorn", "app.main:app", "--reload"], "/home/me/billing", "billing"),
        (["/venv/bin/uvicorn", "main:app"], "/home/me/ledger", "ledger"),
        (["/venv/bin/uvicorn", "main:app"], "/app", "main"),  # nothing better to go on
        (["/venv/bin/hypercorn", "payments.asgi:application"], "/srv", "payments"),
        (["/venv/bin/uvicorn", "--factory", "inventory:create_app"], "/srv", "inventory"),
        (["/venv/bin/gunicorn"], "/srv", "gunicorn"),  # the app is in a config file: the runner's name, as before
        ([""], "/srv", "python"),
        ([], "/srv", "python"),
    ],
)
def test_the_service_name_is_the_apps_not_the_runners(argv: list[str], cwd: str, expected: str) -> None:
    assert default_service(argv, cwd) == expected
