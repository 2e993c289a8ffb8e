"""django-socketmail: a Django email backend with its own SMTP client and an audit log.

``EMAIL_BACKEND = "django_socketmail.backend"`` names the attribute ``backend`` of this
package; it is resolved lazily (PEP 562) so that importing the package imports neither
the backend nor the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .email_backend import EmailBackend
    from .smtp.delivery import DeliveryOptions

__all__ = ["DeliveryOptions", "backend"]

backend: type[EmailBackend]


def __getattr__(name: str) -> Any:
    if name == "backend":
        from .email_backend import EmailBackend

        return EmailBackend
    if name == "DeliveryOptions":
        from .smtp.delivery import DeliveryOptions

        return DeliveryOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
