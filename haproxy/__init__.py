"""The HAProxy include, installed with the package as `spoa.haproxy_include`.

Only here so that the files of this folder are package data (setup.py maps the
package to this folder); `spoa-lease haproxy-include DIR` writes them out.
"""
