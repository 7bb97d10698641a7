"""The controller's HTTP API (OpenAI-compatible, plus the cluster's health, report, metrics and window files).

:mod:`.app` builds and serves the app; the routers (:mod:`.openai`, :mod:`.cluster`, :mod:`.metrics`,
:mod:`.windows`) read the cluster through the :class:`~homering.api.view.ClusterView` protocol, never the
controller's class; :mod:`.schemas` and :mod:`.responses` hold the request and response shapes, :mod:`.errors`
the error objects and the API key check.
"""
