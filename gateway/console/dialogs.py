"""Modal dialogs: a small keyboard-only form and the explicit confirm every write goes through."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, Static

__all__ = ["ConfirmScreen", "Field", "FormScreen"]

# Returns an error message for the form's values, or None when they are acceptable.
Validator = Callable[[dict[str, str]], str | None]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    label: str
    value: str = ""


class FormScreen(ModalScreen[dict[str, str] | None]):
    """Fields one under the other; enter moves on and submits from the last field."""

    DEFAULT_CSS = """
    FormScreen { align: center middle; }
    FormScreen > Vertical {
        width: 72; height: auto; border: thick $accent; background: $surface; padding: 0 1;
    }
    FormScreen .form-row { height: 3; }
    FormScreen .form-label { width: 22; padding: 1 1 0 0; text-style: bold; }
    FormScreen Input { width: 1fr; }
    FormScreen #form-error { color: $error; text-style: bold; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Submit"),
    ]

    def __init__(self, title: str, fields: Sequence[Field], validate: Validator | None = None):
        super().__init__()
        self.title_text = title
        self.fields = tuple(fields)
        self.validate = validate

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, id="form-title")
            for field in self.fields:
                with Horizontal(classes="form-row"):
                    yield Label(field.label, classes="form-label")
                    yield Input(value=field.value, placeholder=field.label, id=f"f-{field.name}")
            yield Static("", id="form-error")
        yield Footer(compact=True)

    def values(self) -> dict[str, str]:
        return {f.name: self.query_one(f"#f-{f.name}", Input).value.strip() for f in self.fields}

    def on_input_submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        index = inputs.index(event.input)
        if index + 1 < len(inputs):
            inputs[index + 1].focus()
        else:
            self.action_submit()

    def action_submit(self) -> None:
        values = self.values()
        problem = self.validate(values) if self.validate else None
        if problem:
            self.query_one("#form-error", Static).update(problem)
            return
        self.dismiss(values)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """States exactly what will happen; only `y` does it."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 72; height: auto; border: thick $warning; background: $surface; padding: 0 1;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes, do it"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel", show=False),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Confirm", id="confirm-title")
            yield Static(self.question, id="confirm-question")
            yield Label("y = yes, n = no")
        yield Footer(compact=True)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
