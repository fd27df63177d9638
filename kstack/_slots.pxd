# Fast access to a __slots__ class's fields from C, for the compiled paths that make or
# touch many sk_buffs per call (kstack/_txfast.pyx). A slot is a PyObject* at a fixed offset
# in the instance (its member descriptor says where); a generic setattr looks the name up in
# the type each time, which was a sixth of the send path. Only for instances of exactly the
# class whose offsets were taken, and only for a class without __setattr__/__getattribute__
# of its own (slot_offset refuses otherwise).
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_DECREF

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char* name
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    PyObject* PyType_GenericAlloc(PyTypeObject* tp, Py_ssize_t nitems) except NULL


cdef inline Py_ssize_t slot_offset(object tp, str name) except -1:
    """Where the __slots__ field `name` of `tp`'s instances lives."""
    if tp.__setattr__ is not object.__setattr__ or tp.__getattribute__ is not object.__getattribute__:
        raise ImportError(f"{tp.__name__} has its own attribute access: no direct slots")
    d = tp.__dict__.get(name)
    if d is None or type(d).__name__ != "member_descriptor":
        raise ImportError(f"{tp.__name__}.{name} is not a __slots__ field")
    return (<PyMemberDescrObject*><PyObject*>d).d_member.offset


cdef inline void slot_set(object o, Py_ssize_t off, object v) noexcept:
    """setattr(o, <the field at off>, v)."""
    cdef PyObject** p = <PyObject**>((<char*><PyObject*>o) + off)
    cdef PyObject* old = p[0]
    Py_INCREF(v)
    p[0] = <PyObject*>v
    Py_XDECREF(old)


cdef inline object slots_new(object tp):
    """tp.__new__(tp) for a plain __slots__ class (object.__new__: allocated, GC-tracked,
    every field unset) without the Python-level call."""
    cdef PyObject* r = PyType_GenericAlloc(<PyTypeObject*>tp, 0)
    o = <object>r
    Py_DECREF(o)  # <object> took its own reference
    return o


cdef inline object slot_get(object o, Py_ssize_t off):
    """getattr(o, <the field at off>), for the cached send state's fields (UdpDst): a new
    reference; an unset field is an AttributeError, as getattr would raise."""
    cdef PyObject* v = (<PyObject**>((<char*><PyObject*>o) + off))[0]
    if v is NULL:
        raise AttributeError("slot not set")
    return <object>v
