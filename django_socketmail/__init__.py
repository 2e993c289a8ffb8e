"""django-socketmail: a Django email backend with its own SMTP client and an audit log.

``EMAIL_BACKEND = "django_socketmail.backend"`` names the attribute ``backend`` of this
package; it is resolved lazily (PEP 562) so that importing the package imports neither
the backend nor the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import amail_admins, amail_managers, asend_mail, asend_mass_mail
    from .email_backend import EmailBackend
    from .smtp.delivery import DeliveryOptions

__all__ = [
    "DeliveryOptions",
    "amail_admins",
    "amail_managers",
    "asend_mail",
    "asend_mass_mail",
    "backend",
]

_ASYNC = frozenset({"amail_admins", "amail_managers", "asend_mail", "asend_mass_mail"})

backend: type[EmailBackend]


def __getattr__(name: str) -> Any:
    if name == "backend":
        from .email_backend import EmailBackend

        return EmailBackend
    if name == "DeliveryOptions":
        from .smtp.delivery import DeliveryOptions

        return DeliveryOptions
    if name in _ASYNC:  # async mail functions (django_socketmail.aio), imported on first use
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
