"""The base of the API's input serializers: what the OpenAPI document says is what is enforced."""

from __future__ import annotations

from rest_framework import serializers


class ApiInput(serializers.Serializer):
    # Reads a query string or a multipart form as it reads JSON. DRF's form handling takes "" for
    # an optional field as "not sent" (an HTML form's empty box), so `?sort=` or an empty `prefix`
    # passed although the document says they cannot be empty. Here "" is a value the field checks:
    # a field that means something when empty says so (allow_blank), and the document shows it.
    # (A comment, not a docstring: the OpenAPI document would show it on every input.)

    def to_internal_value(self, data):
        if hasattr(data, "getlist"):
            lists = {
                name
                for name, field in self.fields.items()
                if isinstance(field, serializers.ListField | serializers.MultipleChoiceField)
            }
            data = {key: data.getlist(key) if key in lists else data.get(key) for key in data}
        return super().to_internal_value(data)
