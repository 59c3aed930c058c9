"""reports: a Django service that calls catalog (FastAPI) through the mesh.

A one-file Django project: settings, URLs and views here, so the example shows only what the mesh adds — the
``MeshMiddleware`` line in ``MIDDLEWARE`` and ``meshlib.Client()`` for the outbound call. A real project keeps the
same two lines in its settings and views.
"""

from __future__ import annotations

import os

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret"),
    MIDDLEWARE=["meshlib.contrib.django.MeshMiddleware"],  # the one line: identity, authorization, deadlines, ...
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

import meshlib  # noqa: E402

catalog = meshlib.Client(timeout=5)  # binds to this process's mesh (named by meshctl run / meshlib.serve) on first use


def summary(request: HttpRequest) -> JsonResponse:
    """How many items the catalog has, and the cheapest: one call through the mesh."""
    items = catalog.get("http://catalog/items").json()["items"]
    cheapest = min(items, key=lambda item: item["price_cents"])
    return JsonResponse({"items": len(items), "cheapest": cheapest["name"], "served_by": "reports"})


urlpatterns = [path("summary", summary)]
app = get_wsgi_application()

if __name__ == "__main__":
    meshlib.serve(app, service="reports", port=int(os.environ.get("PORT", "8401")))
