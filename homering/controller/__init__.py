"""The controller: membership, the state machine and re-planning, admission, requests, windows; see
:mod:`homering.controller.controller` (the composition root) for the map of its modules."""
