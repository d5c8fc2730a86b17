"""Templates: where a queue's key values go, in a page's path or a command's argument.

Placeholders may stand anywhere, with a format spec ({date:%Y}); {{ and }}
are braces.  A value is used as str() gives it, with the spec applied; a
value that cannot be used (NULL, unsafe, too long) makes the template give
None, and the row goes as an invalid name.  A spec that fails for a usable
value is the configuration's fault: ConfigError.
"""

import collections
import glob
import os
import re
import string

from .errors import ConfigError

NAME_MAX = 255
GLOB = re.compile(r"[*?[]")
UNSAFE = re.compile(r"[/\x00-\x1f\x7f]")    # a slash, or a control character
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# What one page template names for one key: directories under the cache
# directory, then the last component; pattern is the last component as an
# fnmatch pattern when it holds glob characters (None: the name itself);
# directory: the last component is a directory, cleared and removed.
Target = collections.namedtuple("Target", "dirs last pattern directory")


class Unusable:
    """A value the database holds that Python cannot hold (a date past 9999, or
    before year 1, or +-infinity): it names no page."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def valid_name(name):
    """Is name exactly one plain path component?"""
    if name in ("", ".", "..") or UNSAFE.search(name):
        return False
    try:
        return len(name) <= NAME_MAX // 4 or len(os.fsencode(name)) <= NAME_MAX
    except UnicodeError:
        return False


class Fields:
    """Text with placeholders: its pieces, [(literal, placeholder or None, spec)]."""

    path = False    # a value must be one path component (and a spec give no /)

    def __init__(self, text, part, keys):
        self.text = text
        try:
            parsed = list(string.Formatter().parse(part))
        except ValueError as e:
            self.refuse("%s (a brace is written {{ or }})" % e)
        if any(conversion for _, _, _, conversion in parsed):
            self.refuse("no !conversion in a placeholder")
        self.pieces = [(literal, name, spec) for literal, name, spec, _ in parsed]
        self.literal = "".join(literal for literal, _, _ in self.pieces)
        self.names = {name for _, name, _ in self.pieces if name is not None}
        for name in sorted(self.names):
            if name == "" or name.isdigit():
                self.refuse("{%s} names no key column; a placeholder is {NAME}" % name)
            if keys is not None and name not in dict(keys):
                self.refuse("unknown placeholder {%s}; there are %s"
                            % (name, ", ".join("{%s}" % k for k, _ in keys)))

    def refuse(self, why):
        raise ConfigError("template %r: %s" % (self.text, why))

    def render(self, value, spec):
        """A placeholder's text, or None when the row's value cannot be used."""
        if value is None or isinstance(value, Unusable):
            return None
        text = str(value)
        if not valid_name(text) if self.path else CONTROL.search(text):
            return None
        if spec:
            try:
                text = format(value, spec)
            except OverflowError:
                return None     # out of the spec's range ({n:c} of a huge n): this value's fault
            except (TypeError, ValueError) as e:
                self.refuse("{:%s} cannot format %r: %s" % (spec, value, e))
            if CONTROL.search(text) or (self.path and "/" in text):
                self.refuse("{:%s} makes %r of %r" % (spec, text, value))
        return text

    def fill(self, values, escape=False):
        """The text with the values put in, or None if a value cannot be used."""
        out = []
        for literal, name, spec in self.pieces:
            if literal:
                out.append(literal)
            if name is not None:
                text = self.render(values[name], spec)
                if text is None:
                    return None
                out.append(glob.escape(text) if escape else text)
        return out[0] if len(out) == 1 else "".join(out)     # a value alone: shared


class Argument(Fields):
    """One argument of a queue's command: control characters never go into one."""

    def __init__(self, text, keys=None):
        super().__init__(text, text, keys)


class Component(Fields):
    """One component of a page template."""

    path = True

    def expand(self, values):
        """Its name for the values, or None if a value cannot be used."""
        if not self.names:
            return self.literal     # checked at start-up
        if len(self.pieces) == 1 and not self.pieces[0][0] and not self.pieces[0][2]:
            return self.render(values[self.pieces[0][1]], "")     # a value alone
        name = self.fill(values)
        return name if name is not None and valid_name(name) else None  # too long?


class Page:
    """A page template, such as categories/{category}/*, under the cache directory.

    Only its last component may hold glob characters, and a value put into
    it matches only itself (glob.escape); one that ends in / names a
    directory.  keys, where known at start-up, are the names placeholders
    may take.
    """

    def __init__(self, text, keys=None):
        self.text = text
        self.directory = text.endswith("/")
        if not text or re.search(r"\s", text):
            self.refuse("empty or has white space")
        if text.startswith("/"):
            self.refuse("must be relative to the cache directory")
        parts = (text[:-1] if self.directory else text).split("/")
        self.components = [Component(text, part, keys) for part in parts]
        for component in self.components:
            for _, name, spec in component.pieces:
                if spec and "/" in spec:
                    self.refuse("{%s:%s}: a / in a format spec" % (name, spec))
            if not component.names and not valid_name(component.literal):
                self.refuse("%r is no file name" % component.literal)
        last = self.components[-1]
        if any(GLOB.search(c.literal) for c in self.components[:-1]) or (
                self.directory and GLOB.search(last.literal)):
            self.refuse("glob characters before the last component, or in a directory")
        self.names = {name for c in self.components for name in c.names}
        self.glob = bool(GLOB.search(last.literal))

    def refuse(self, why):
        raise ConfigError("template %r: %s" % (self.text, why))

    def expand(self, values):
        """The Target the values name, or None if a value cannot be used.

        A value cannot be used if it is NULL, unsafe, or too long once the
        template's text is added.
        """
        names = [c.expand(values) for c in self.components]
        if None in names:
            return None
        pattern = None
        if self.glob:   # a port named 'a*' never matches another's page
            pattern = self.components[-1].fill(values, escape=True)
        return Target(tuple(names[:-1]), names[-1], pattern, self.directory)
