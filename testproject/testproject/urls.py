"""The test project's URLs: the admin, where the audit log lives, and the async views that
send mail (:mod:`testproject.views`)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("send/", views.send, name="send"),
    path("send-message/", views.send_message, name="send-message"),
]
