"""The test project as an ASGI application, for an ASGI server::

    cd testproject && python -m uvicorn testproject.asgi:application

Its async views (:mod:`testproject.views`) then send on the server's event loop.  With
``DEBUG`` the admin's static files are served too (as ``runserver`` does), so the admin
has its styles.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

application = get_asgi_application()
if settings.DEBUG:
    application = ASGIStaticFilesHandler(application)
