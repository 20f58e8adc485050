"""What every reward needs first: the text of a completion, whatever shape TRL hands it over in.

TRL passes either strings (standard format) or chat messages (conversational format: a list of
{"role", "content"} dicts, the assistant's turn last). Content may itself be a list of parts
({"type": "text", "text": ...}) in the multimodal format.
"""


def completion_text(completion) -> str:
    """The assistant's text: the string itself, or the content of the last assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    messages = list(completion or [])
    if not messages:
        return ""
    assistant = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    last = assistant[-1] if assistant else messages[-1]
    if not isinstance(last, dict):
        raise TypeError(f"a chat completion must be a list of {{'role', 'content'}} dicts, got {type(last).__name__}")
    return _content_text(last.get("content"))


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))
