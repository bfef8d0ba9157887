"""Remember a widget's choices (tile size, budgets, sliders, ...) across re-opens and sessions.

Values live in a per-user INI file through ``QSettings`` (organisation ``napari-unet-studio``),
one group per widget. Layer choices are not remembered: they belong to one viewer's layers.
"""

from __future__ import annotations

from qtpy.QtCore import QSettings
from qtpy.QtWidgets import QCheckBox, QComboBox

ORGANIZATION = "napari-unet-studio"
APPLICATION = "widgets"


def settings() -> QSettings:
    """The plugin's settings store (an INI file in the user's configuration folder)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION)


def _value(control):
    if isinstance(control, QCheckBox):
        return control.isChecked()
    if isinstance(control, QComboBox):
        return control.currentText()
    return control.value()


def _restore(control, stored) -> None:
    try:
        if isinstance(control, QCheckBox):
            control.setChecked(str(stored).lower() in ("true", "1"))
        elif isinstance(control, QComboBox):
            if control.findText(str(stored)) >= 0:
                control.setCurrentText(str(stored))
        else:  # spin boxes and sliders
            kind = type(control.value())
            control.setValue(kind(float(stored)))
    except (TypeError, ValueError):
        pass  # a hand-edited or outdated value: keep the widget's default


def _changed_signal(control):
    if isinstance(control, QCheckBox):
        return control.toggled
    if isinstance(control, QComboBox):
        return control.currentTextChanged
    return control.valueChanged


def persist(group: str, controls: dict) -> None:
    """Restore ``controls`` (name -> QCheckBox, QComboBox with fixed items, spin box or slider) from the
    settings group ``group`` and save every later change there."""
    store = settings()
    store.beginGroup(group)
    for name, control in controls.items():
        if store.contains(name):
            _restore(control, store.value(name))
    store.endGroup()

    for name, control in controls.items():
        _changed_signal(control).connect(lambda *_, n=name, c=control: settings().setValue(f"{group}/{n}", _value(c)))
