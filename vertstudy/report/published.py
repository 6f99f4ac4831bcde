"""The paper's published rows (Qin et al., Tables I-IV), copied as printed.

These are results on the CSI 2014 (MICCAI 2014) spine CT data set, not on our data. They are
kept as the printed strings (``"-"`` where the paper has no value) so they can only ever be
*shown* beside our numbers, never enter a computation. One deviation from the printed text:
Table I's first mean reads ``13.6.`` in the extracted paper text (a stray full stop); it is
given here as ``13.6``, the value the paper's own discussion quotes.
"""

from __future__ import annotations

LABEL = "published (Qin et al., CSI 2014 data set)"
NOTE = ("Published results of Qin et al. on the CSI 2014 (MICCAI 2014) spine CT data set, copied from the "
        "paper; not measured on our data and not comparable number for number.")

#: Table I: localization error (mm) of the localization heads and other methods.
TABLE1 = {
    "columns": ["Method", "Mean (mm)", "Std (mm)"],
    "rows": [
        ["DI2IN [21]", "13.6", "37.5"],
        ["DI2IN+MP [21]", "10.2", "13.9"],
        ["DI2IN+ConvLSTM [20]", "8.7", "8.5"],
        ["DI2IN+MP+Sparsity [21]", "8.6", "7.8"],
        ["Btrfly Network [22]", "6.3", "4.0"],
        ["3D CNN LOC [23]", "7.05", "-"],
        ["Integral Regression (Qin et al.)", "2.9", "3.1"],
    ],
}

#: Table II: multi-label classification mAP (%).
TABLE2 = {
    "columns": ["Method", "mAP (%)"],
    "rows": [
        ["Classification without Bi-LSTM", "85.6"],
        ["Classification with Bi-LSTM", "90.3"],
    ],
}

#: Table III: localization-only network versus localization + classification network.
TABLE3 = {
    "columns": ["Network", "Id. rate (%)", "Mean (mm)", "Std (mm)"],
    "rows": [
        ["Localization network", "62.7", "2.9", "3.1"],
        ["Localization and classification network", "89.0", "2.3", "2.8"],
    ],
}

#: Table IV: identification rate (%) and mean (std) error (mm), overall and per region.
TABLE4 = {
    "columns": ["Method", "Id ALL", "Id Cer.", "Id Tho.", "Id Lum.", "Id Sac.",
                "Err ALL", "Err Cer.", "Err Tho.", "Err Lum.", "Err Sac."],
    "rows": [
        ["Chen [19]", "84.2", "91.8", "76.4", "88.1", "-", "8.8(13.0)", "5.1(8.2)", "11.4(16.5)", "8.2(8.6)", "-"],
        ["Yang [20]", "85", "92", "81", "83", "-", "8.6(7.8)", "5.6(4.0)", "9.2(7.9)", "11.0(10.8)", "-"],
        ["Liao [23]", "88.3", "95.1", "84.0", "92.2", "-", "6.5(8.6)", "4.5(4.6)", "7.8(10.2)", "5.6(7.7)", "-"],
        ["Btrfly [22]", "86.7", "89.4", "83.1", "92.6", "-", "6.3(4.0)", "6.1(5.4)", "6.9(5.5)", "5.7(6.6)", "-"],
        ["Btrfly pe-w [22]", "87.7", "89.2", "85.8", "92.9", "-", "6.4(4.2)", "5.8(5.4)", "7.2(5.7)", "5.6(6.2)", "-"],
        ["Btrfly pe-eb [22]", "88.5", "89.9", "86.2", "91.4", "-", "6.2(4.1)", "5.9(5.5)", "6.8(5.9)", "5.8(6.6)",
         "-"],
        ["Qin et al.", "89.0", "90.8", "86.7", "89.7", "96.9", "2.9(5.8)", "2.2(5.6)", "3.4(6.5)", "2.9(4.3)",
         "2.2(2.7)"],
    ],
}

TABLES = {"table1": TABLE1, "table2": TABLE2, "table3": TABLE3, "table4": TABLE4}
