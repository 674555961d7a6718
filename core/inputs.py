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
        is_form = hasattr(data, "getlist")  # a query string or a form: text, not typed values
        if is_form:
            lists = {
                name
                for name, field in self.fields.items()
                if isinstance(field, serializers.ListField | serializers.MultipleChoiceField)
            }
            data = {key: data.getlist(key) if key in lists else data.get(key) for key in data}
        if isinstance(data, dict):
            # DRF trims a value before it counts its length: " " + 200 characters passed a
            # max_length of 200 that the document states for the value as sent
            too_long = {
                name: [f"Ensure this field has no more than {field.max_length} characters."]
                for name, field in self.fields.items()
                if isinstance(field, serializers.CharField)
                and field.max_length is not None
                and isinstance(data.get(name), str)
                and len(data[name]) > field.max_length
            }
            if too_long:
                raise serializers.ValidationError(too_long)
        if isinstance(data, dict) and not is_form:
            # JSON has types: DRF would take 0 for a name or "5" for a page size; the document says
            # string and integer, and so does the server
            wrong = {
                name: [f"Must be {JSON_TYPES[kind][1]}."]
                for name, field in self.fields.items()
                if name in data and data[name] is not None
                for kind in [next((k for k in JSON_TYPES if isinstance(field, k)), None)]
                if kind is not None and not _is_json_type(data[name], JSON_TYPES[kind][0])
            }
            if wrong:
                raise serializers.ValidationError(wrong)
        return super().to_internal_value(data)


def _is_json_type(value, types: tuple) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


# the first matching field class wins: BooleanField before the number fields, as bool is an int
JSON_TYPES = {
    serializers.BooleanField: ((bool,), "true or false"),
    serializers.IntegerField: ((int,), "a whole number"),
    serializers.FloatField: ((int, float), "a number"),
    serializers.CharField: ((str,), "a string"),
    serializers.ChoiceField: ((str,), "a string"),
    serializers.DateField: ((str,), "a date (YYYY-MM-DD)"),
    serializers.ListField: ((list,), "a list"),
}
