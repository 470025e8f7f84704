"""The admission and conversion webhooks the Kubernetes API server calls (spec §1.1, §1.4-1.6).

Three modules, thinnest I/O last:

 - L{review<sidero.k8s.webhook.review>}: the C{ConversionReview}/C{AdmissionReview} codec and
   the pure L{WebhookHandler} answering them.
 - L{registration<sidero.k8s.webhook.registration>}: the CRDs' C{spec.conversion} and the
   C{ValidatingWebhookConfiguration} pointing at us, and L{install_webhooks} applying them.
 - L{service<sidero.k8s.webhook.service>}: the HTTPS listener (L{make_webhook_service}).

What the rest of the program uses is importable from here.
"""

from sidero.k8s.webhook.registration import WebhookEndpoint, install_webhooks
from sidero.k8s.webhook.review import WebhookCounters, WebhookCountersCollector, WebhookHandler
from sidero.k8s.webhook.service import WebhookService, make_webhook_service

__all__ = [
    "WebhookCounters",
    "WebhookCountersCollector",
    "WebhookEndpoint",
    "WebhookHandler",
    "WebhookService",
    "install_webhooks",
    "make_webhook_service",
]
