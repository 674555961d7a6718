"""The shared kernel, below every app: it imports none of them and nothing of config/ (settings
only through django.conf). The error shape (errors), the cursor codec (cursor), keyed
pseudonyms (pseudonym), API inputs and page envelopes (inputs, pagination), CSV cells and lines
(spreadsheet), streamed responses (streaming), the request-body cap (body_limit), the request id
(request_id), Cache-Control (cache_control), log filters (log_filters), many rows in one
statement (bulk), the transient-error rules (transient), the model package format
(model_package)."""
