"""The edit request: one fact to rewrite, with the prompts used to evaluate it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class LocalityPrompt(BaseModel):
    """A filled prompt with its answer: a neighbour fact, whose answer must NOT change when
    the edit lands, or a portability question, whose answer the edit should bring along."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1, description="Filled prompt, no '{}'.")
    target: str = Field(min_length=1, description="Its true answer (scored with a leading space).")


class EditRequest(BaseModel):
    """One edit: make `prompt.format(subject)` continue with `target_new`.

    `prompt` is a template with exactly one `{}` where the subject goes; every other prompt
    is already filled. Targets are stored as given; scoring adds the leading space (GPT-2 BPE
    convention) via `spaced()`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: int = Field(ge=0, description="Unique id of the record within its dataset.")
    prompt: str = Field(description="Template with exactly one '{}' for the subject.")
    subject: str = Field(min_length=1)
    target_new: str = Field(min_length=1, description="The new object the edit installs.")
    target_true: str | None = Field(
        default=None, description="The object the model knows before the edit (None for zsRE)."
    )
    target_neg: str | None = Field(
        default=None,
        description="A wrong answer the record itself names (EasyEdit's `target_neg`); DPO "
        "pushes it down, and target_true where it is absent.",
    )
    relation_id: str | None = None
    paraphrase_prompts: list[str] = Field(default_factory=list)
    neighborhood_prompts: list[LocalityPrompt] = Field(default_factory=list)
    generation_prompts: list[str] = Field(default_factory=list)
    portability_prompts: list[LocalityPrompt] = Field(
        default_factory=list,
        description="Questions whose answer follows from the edited fact (EasyEdit's "
        "portability: reasoning, aliases), each with the answer expected after the edit.",
    )

    @field_validator("target_new", "target_true", "target_neg")
    @classmethod
    def _target_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("target is empty or whitespace only")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        count = value.count("{}")
        if count != 1:
            raise ValueError(f"prompt template must contain exactly one '{{}}', found {count}")
        return value

    @model_validator(mode="after")
    def _subject_not_blank(self) -> EditRequest:
        if not self.subject.strip():
            raise ValueError("subject is empty or whitespace only")
        return self

    def to_json(self) -> str:
        """The record as one JSON line; `target_neg` only where it is set, so files of records
        without one read the same as before the field existed (and in earlier releases)."""
        return self.model_dump_json(exclude=None if self.target_neg else {"target_neg"})

    @property
    def filled_prompt(self) -> str:
        """The rewrite prompt with the subject in place."""
        return self.prompt.replace("{}", self.subject)


def spaced(target: str) -> str:
    """Targets are scored with one leading space, as the reference code does."""
    return target if target.startswith(" ") else " " + target
