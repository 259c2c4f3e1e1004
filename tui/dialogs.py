"""Small modal screens: a yes/no confirmation, a choice, a file path prompt, the plots' curves."""
from __future__ import annotations

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, SelectionList


class ConfirmScreen(ModalScreen[bool]):
    """Asks a question; dismisses with True (y / the action button) or False (n / Esc)."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, action: str = "Yes") -> None:
        super().__init__()
        self.question, self.action_label = question, action

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            with Horizontal(classes="buttons"):
                yield Button(f"{self.action_label} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class ChoiceScreen(ModalScreen[str]):
    """Asks a question with several answers, each with its key; dismisses with the answer's key,
    or "" on Esc (cancel)."""

    BINDINGS = [Binding("escape", "choose('')", "Cancel")]

    def __init__(self, question: str, choices: "list[tuple[str, str]]") -> None:
        """`choices`: (key, label) pairs; the first is the default button."""
        super().__init__()
        self.question, self.choices = question, choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            with Vertical(classes="choices"):
                for i, (key, label) in enumerate(self.choices):
                    yield Button(f"{label} ({key})", id=f"choice-{key}", compact=True,
                                 variant="primary" if i == 0 else "default")

    def action_choose(self, key: str) -> None:
        self.dismiss(key)

    def on_key(self, event: events.Key) -> None:
        if event.key in {key for key, _label in self.choices}:
            event.stop()
            self.dismiss(event.key)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id.removeprefix("choice-"))


class PathScreen(ModalScreen[str]):
    """Asks for a file path; dismisses with it (Enter) or "" (Esc)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str) -> None:
        super().__init__()
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text)
            yield Input(self.value, id="path")
            yield Label("Enter to confirm, Esc to cancel", classes="hint")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss("")


class CurvesScreen(ModalScreen[frozenset]):
    """A checklist of the plots' curves (space or enter ticks one, or its number key); dismisses
    with the curves left unticked (Esc, or c again: the dialog closes where it opened)."""

    BINDINGS = [Binding("escape,c", "close", "Close")]

    def __init__(self, curves: "dict[str, str]", hidden: frozenset) -> None:
        """`curves`: name -> what it is; `hidden`: the names not drawn now."""
        super().__init__()
        self.curves, self.hidden = curves, hidden

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Curves drawn (space toggles, Esc closes):")
            yield SelectionList(*((f"{i} {what}", name, name not in self.hidden)
                                  for i, (name, what) in enumerate(self.curves.items(), 1)), id="curves")

    def on_key(self, event: events.Key) -> None:
        names = list(self.curves)
        if event.character and event.character.isdigit() and 1 <= int(event.character) <= len(names):
            event.stop()
            self.query_one(SelectionList).toggle(names[int(event.character) - 1])

    def action_close(self) -> None:
        shown = set(self.query_one(SelectionList).selected)
        self.dismiss(frozenset(name for name in self.curves if name not in shown))
